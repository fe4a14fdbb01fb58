"""NVFP4 with AWQ-searched pre-quant scales (ModelOpt's AWQ-lite NVFP4 config): the NVFP4 layout, Blackwell."""

import dataclasses

from pipeline.formats.nvfp4 import NVFP4

NVFP4_AWQ = dataclasses.replace(NVFP4, name="nvfp4_awq", modelopt_config="NVFP4_AWQ_LITE_CFG",
                                default_algorithm="awq_lite")
