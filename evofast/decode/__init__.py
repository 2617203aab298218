"""EvoToken (and hard-mask) decoding: `generate` and the pieces it is made of.

    config.py      DecodeConfig: every argument, checked once before any forward
    state.py       DecodeState: token / confidence records, soft representation, per-row blocks
    policies.py    transfer policies: the authors' Schedule, Threshold, STDD's Stdd (a new one is a small class)
    cache_plan.py  CachePlan: which positions a forward runs with a KV cache, when it refreshes
    forward.py     ModelForward: the step's forward (cached, compiled) and its window logits
    observers.py   hooks called at every step: ProgressBar, TraceRecorder, StepTimer
    loop.py        generate: the loop that composes them

The semantics (the authors' loop, its quirks, what is exact) are in docs/semantics.md.
"""
from .config import CACHES, MODES, DecodeConfig
from .loop import generate
from .observers import Observer, ProgressBar, StepOutput, StepTimer, TraceRecorder
from .policies import Schedule, Stdd, Threshold, TransferPolicy

__all__ = ["generate", "DecodeConfig", "MODES", "CACHES", "Observer", "StepOutput", "ProgressBar",
           "TraceRecorder", "StepTimer", "TransferPolicy", "Schedule", "Threshold", "Stdd"]
