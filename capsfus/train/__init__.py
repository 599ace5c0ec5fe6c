"""Finetuning a fusion model (CapsFus-LLaMA) on (raw, synthetic, fused) triplets.

- ``config``: the training settings (YAML presets under ``jobs/``, CLI overrides);
- ``data``: rows of a run (teacher / fuse / input stage) or an outside file → tokenized
  prompt + target, prompt tokens masked, a stable held-out split;
- ``trainer``: HF Trainer + DeepSpeed ZeRO-3, run by every rank;
- ``checkpoints``: completion markers, retention, the latest complete checkpoint;
- ``export``: the HF folder that ``capsfus fuse --model DIR`` loads;
- ``launch``: ranks here (``--nproc``) or on SLURM (torch distributed env from SLURM).

Heavy imports (torch, transformers, deepspeed) stay inside functions.
"""
