"""Integrations of evofast with other tools, a layer on top of the library: nothing
else in evofast imports these modules, and importing evofast never imports them.

    evofast.integrations.lm_eval        the "evofast" model of EleutherAI's lm-evaluation-harness
    evofast.integrations.lm_eval_paper  the hooks of its task files for the paper's four benchmarks
    evofast.integrations.likelihood     Monte-Carlo log-likelihood of a masked diffusion model
"""
