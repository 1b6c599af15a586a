"""Federated LoRA on the Transformer copying task: the experiment's parts.

The study is :mod:`simulations.studies.copying` (``python -m simulations copying
--scale smoke|small|full``); this package holds what it is made of: the model
(``model.py``), the tasks (``tasks.py``), cached pretraining (``pretrain.py``), client
fine-tuning with peft (``finetune.py``), the methods compared (``methods.py``), one
replicate (``replicate.py``) and the summaries the checks and the paper read
(``analysis.py``). ``PROTOCOL.md`` is the pre-registration of the confirmatory run.
Importing this package does not import torch.
"""
