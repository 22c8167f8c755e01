"""Build of nrrdd_ext (the C++/CUDA ops) and nrrdd (the driver, under python/).

CPU kernels are always built. CUDA kernels are built when torch is a CUDA build
and nvcc is found, or when NRRDD_FORCE_CUDA=1 (then with no GPU visible, and
TORCH_CUDA_ARCH_LIST defaults to 9.0, the H100/H200). NRRDD_CPU_ONLY=1 skips them.

Build with ``pip install --no-build-isolation .`` so the torch already installed
is the one compiled against.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _find_cuda_home():
    """CUDA_HOME must be the toolkit root (the folder holding bin/nvcc and include/)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        # the toolkit root holds bin/nvcc and include/cuda_runtime.h (a wrapper script
        # such as /usr/local/bin/nvcc has neither beside it)
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and \
                os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    if os.environ.get("NRRDD_CPU_ONLY", "0") == "1":
        return False, "NRRDD_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if _cuda_home is None:
        return False, "nvcc not found (set CUDA_HOME to the toolkit root)"
    if os.environ.get("NRRDD_FORCE_CUDA", "0") == "1" or torch.cuda.is_available():
        return True, "CUDA kernels enabled"
    return True, "CUDA kernels enabled (nvcc found, no GPU visible)"


def _wheel_cuda_includes():
    """torch's CUDA headers include cusparse.h etc., which the nvidia-* wheels ship."""
    found = []
    for site in sys.path:
        for d in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) + \
                glob.glob(os.path.join(site, "nvidia", "*", "include")):
            if os.path.exists(os.path.join(d, "cusparse.h")) and d not in found:
                found.append(d)
    return found


def extensions():
    use_cuda, why = _want_cuda()
    print(f"nrrdd_ext: {why}", file=sys.stderr)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    if not use_cuda:
        return [CppExtension("nrrdd_ext._C", sources, extra_compile_args={"cxx": cxx})]
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        print("nrrdd_ext: no GPU visible, building CUDA kernels for TORCH_CUDA_ARCH_LIST=9.0 "
              "(H100/H200); set TORCH_CUDA_ARCH_LIST for other GPUs", file=sys.stderr)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    return [CUDAExtension("nrrdd_ext._C", sources, include_dirs=_wheel_cuda_includes(),
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc})]


setup(
    name="nrrdd_ext",
    version="0.1.0",
    description="Fused C++/CUDA ops and a driver for NRR-DD dataset distillation",
    packages=find_packages(include=["nrrdd_ext", "nrrdd_ext.*"]) + find_packages("python"),
    package_dir={"nrrdd": "python/nrrdd", "nrrdd.commands": "python/nrrdd/commands"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["nrrdd = nrrdd.cli:main"]},
    python_requires=">=3.9",
    install_requires=["torch", "torchvision", "numpy", "timm", "tqdm"],
    zip_safe=False,
)
