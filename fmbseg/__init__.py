"""fmbseg: annotation-free semantic segmentation with vision foundation models (FMbSeg, arXiv 2403.09307).

The library: model adapters, the per-image Stage-1 algorithm, the alignment module, losses, metrics,
segmenters, vocabularies, presets and the synthetic world. It imports nothing else of the repository.
"""

__version__ = "0.2.0"

# Label maps are uint16; pixels no selected mask covers carry this value.
IGNORE_LABEL = 65535
