"""Noisy-label detectors beside CLIPCleaner's selection, on the score files' embeddings.

- deft.py: DeFT's learned positive / negative prompts (Wei et al., NeurIPS 2024)
- cleannet.py: CleanNet's verified reference sets (Lee et al., CVPR 2018)
- ensemble.py: the members' score ranks combined
- verified.py: the human-verified labels CleanNet learns from (a CSV / Parquet file)
- blocks.py: the usable rows of the score files as blocks, passes over them on Ray
- fit.py: fitting what `selection.detector` asks for; apply.py: into the manifest
- peft.py: LoRA and visual prompts for open_clip image towers (DeFT's image tuning and
  the `clip_peft` training network)

`selection.detector=clipcleaner` (the default) uses none of this.
"""
