"""diffkd: diffusion-based knowledge distillation (DiffKD, Huang et al., NeurIPS 2023), faithful and fast."""
from diffkd._kernels_check import check_kernels_package
check_kernels_package()  # before anything imports `kernels`: another package of that name fails here, clearly
from diffkd.distill import Distiller, build_distiller
from diffkd.methods import MethodSettings, method_settings
from diffkd.graphs import CUDAGraphHead
from diffkd.loss import DiffKDLoss
from diffkd.losses import dist_loss, kl_div_loss, mse_loss
from diffkd.models.taps import FeatureTaps
from diffkd.modules import (Bneck, Denoiser, DiffKDHead, LinearAutoencoder, NoiseAdapter,
                            load_official_state_dict)
from diffkd.schedule import DDIMSchedule

__version__ = "0.1.0"

__all__ = ["DiffKDLoss", "FeatureTaps", "DDIMSchedule", "DiffKDHead", "CUDAGraphHead", "Bneck", "Denoiser", "NoiseAdapter", "LinearAutoencoder",
           "load_official_state_dict", "kl_div_loss", "dist_loss", "mse_loss", "Distiller", "MethodSettings",
           "build_distiller", "method_settings", "__version__"]
