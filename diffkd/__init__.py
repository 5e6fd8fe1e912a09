"""diffkd: diffusion-based knowledge distillation (DiffKD, Huang et al., NeurIPS 2023), faithful and fast.

``DiffKDLoss`` (DiffKD heads over named feature pairs) and ``FeatureTaps`` (named features of a forward pass)
serve any training loop; the Distillers serve the trainer (``python -m diffkd.train``).  ``import diffkd`` stays
light: torchvision, the dense models, the datasets and the trainer are imported when first used.
"""
from diffkd._kernels_check import check_kernels_package
check_kernels_package()  # before anything imports `kernels`: another package of that name fails here, clearly
from diffkd._lazy import lazy_attributes  # noqa: E402
from diffkd.distill import (DetectionDistiller, Distiller, HeadBinding, SegmentationDistiller,  # noqa: E402
                            build_detection_distiller, build_distiller, build_segmentation_distiller)
from diffkd.loss import DiffKDLoss  # noqa: E402
from diffkd.losses import dist_loss, kl_div_loss, mse_loss  # noqa: E402
from diffkd.methods import MethodSettings, method_settings  # noqa: E402
from diffkd.models.taps import FeatureTaps  # noqa: E402
from diffkd.modules import (Bneck, Denoiser, DiffKDHead, LinearAutoencoder, NoiseAdapter,  # noqa: E402
                            load_official_state_dict)
from diffkd.schedule import DDIMSchedule  # noqa: E402

__version__ = "0.1.0"

# On first use: diffkd.graphs imports torch._dynamo (seconds); graph_heads, which wraps a trainer Distiller's heads
# as --cuda-graph says, lives with the trainer's builders.
__getattr__, __dir__ = lazy_attributes(__name__, {"diffkd.graphs": ("CUDAGraphHead", "head_path"),
                                                  "diffkd.train.build": ("graph_heads",)})

__all__ = ["DiffKDLoss", "FeatureTaps", "DiffKDHead", "CUDAGraphHead", "head_path", "graph_heads", "DDIMSchedule",
           "Bneck", "Denoiser", "NoiseAdapter", "LinearAutoencoder", "load_official_state_dict", "kl_div_loss",
           "dist_loss", "mse_loss", "Distiller", "DetectionDistiller", "SegmentationDistiller", "HeadBinding",
           "build_distiller", "build_detection_distiller", "build_segmentation_distiller", "MethodSettings",
           "method_settings", "__version__"]
