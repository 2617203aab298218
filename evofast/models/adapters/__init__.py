"""One adapter per architecture: what `evofast.generate` and `evofast.cts` need from a model
(the contract is `evofast.models.base.Adapter`); `evofast.models.registry` picks one by model type.

    llada_native.py   evofast's own LLaDA (`evofast.models.llada`)
    llada_remote.py   LLaDA's remote code (`trust_remote_code=True`)
    masked_lm.py      BERT / RoBERTa / ModernBERT masked LMs
    dream.py          Dream, and Qwen2 checkpoints run bidirectionally
"""
