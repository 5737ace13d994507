"""Builds moe_ep._C: the torch.ops.moe_ep operators and the bindings of the torch-free core.

CUDA kernels are built whenever torch was built with CUDA and nvcc is found (no GPU is
needed to compile them). MOE_EP_CPU_ONLY=1 forces a CPU-only build, which is much faster
to iterate on. TORCH_CUDA_ARCH_LIST overrides the default target (Hopper, 9.0).
MOE_EP_SANITIZE=1 (with MOE_EP_CPU_ONLY=1) instruments the CPU ops with AddressSanitizer and
UndefinedBehaviorSanitizer (scripts/sanitize.sh).
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def core_sources() -> list[str]:
    """The single list of torch-free sources, shared with CMakeLists.txt."""
    with open(os.path.join(ROOT, "csrc", "core", "sources.txt")) as f:
        names = [line.strip() for line in f]
    return [f"csrc/core/{name}" for name in names if name and not name.startswith("#")]


def relative_glob(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def build_with_cuda() -> bool:
    if os.environ.get("MOE_EP_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    sources = (
        core_sources() + relative_glob("csrc/ops/*.cpp") + relative_glob("csrc/bindings/*.cpp")
    )
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-fvisibility=hidden"]
    link_flags = []
    if os.environ.get("MOE_EP_SANITIZE", "0") == "1":  # scripts/sanitize.sh: CPU ops only
        sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        cxx_flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fvisibility=hidden", *sanitizers]
        link_flags = sanitizers
    if not build_with_cuda():
        return cpp_extension.CppExtension(
            "moe_ep._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    sources += relative_glob("csrc/ops/cuda/*.cpp") + relative_glob("csrc/ops/kernels/*.cu")
    return cpp_extension.CUDAExtension(
        "moe_ep._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("MOE_EP_WITH_CUDA", "1")],
        libraries=["cublas"],
        extra_compile_args={
            "cxx": cxx_flags + ["-DMOE_EP_WITH_CUDA=1"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
