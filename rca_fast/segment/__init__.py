"""``python -m rca_fast.segment``: step 3 of the workflow -- a segmentation network trained on the
proxy labels of ``rca_fast.pseudo`` and scored on the validation images (see ``__main__``).

``args`` (flags and defaults), ``trainer`` (SGD + poly loop, checkpoints, resume, DDP),
``predict`` (single- / multi-scale + flip / CRF evaluation, PNGs, overlays).
"""
