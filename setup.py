"""Builds moe_ep._C: the torch.ops.moe_ep operators and the bindings of the torch-free core.

CUDA kernels are built whenever torch was built with CUDA and nvcc is found (no GPU is
needed to compile them). MOE_EP_CPU_ONLY=1 forces a CPU-only build, which is much faster
to iterate on. TORCH_CUDA_ARCH_LIST chooses the CUDA architectures; unset, they are those of
the GPUs present (PyTorch's default) or, on a machine without a GPU, DEFAULT_CUDA_ARCHS.
The architectures built are recorded in moe_ep._C.cuda_targets, which moe_ep checks at
import against the GPUs it finds.
MOE_EP_SANITIZE=1 (with MOE_EP_CPU_ONLY=1) instruments the CPU ops with AddressSanitizer and
UndefinedBehaviorSanitizer (scripts/sanitize.sh).
"""

import glob
import os
import subprocess

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

# Ampere (A100; its code also runs on 8.6/8.9), Hopper, Blackwell (B200/GB200 and B300;
# RTX 50 / RTX PRO), each kept where the installed nvcc supports it, with PTX of the newest
# on top so that later GPUs can compile it at load time.
DEFAULT_CUDA_ARCHS = ["8.0", "9.0", "10.0", "12.0"]


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


def default_cuda_arch_list() -> str:
    """DEFAULT_CUDA_ARCHS that the installed nvcc can build, the newest also as PTX."""
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    listed = subprocess.run(
        [nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True
    ).stdout.split()
    supported = {f"{int(name[8:]) // 10}.{int(name[8:]) % 10}" for name in listed}
    archs = [arch for arch in DEFAULT_CUDA_ARCHS if arch in supported]
    if not archs:
        raise RuntimeError(f"{nvcc} builds none of {DEFAULT_CUDA_ARCHS}; set TORCH_CUDA_ARCH_LIST")
    return ";".join(archs) + "+PTX"


def cuda_targets() -> list[str]:
    """What nvcc will put in the binary ("sm_90", "compute_120"), from the flags torch passes.

    PyTorch's own default (the GPUs present) fails where there is none, so a machine without
    a GPU gets the documented list instead (set in TORCH_CUDA_ARCH_LIST, which torch reads).
    """
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list()
    # Private, but it is the very function BuildExtension calls to make nvcc's -gencode flags.
    flags = cpp_extension._get_cuda_arch_flags()
    targets = {flag.split(",code=")[1] for flag in flags}  # -gencode=arch=compute_90,code=sm_90
    return sorted(targets, key=lambda t: (int(t.split("_")[1].rstrip("af")), t.startswith("c")))


def write_if_changed(path: str, text: str) -> None:
    """Leaves an unchanged file alone, so that ninja does not recompile what includes it."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, after writing the CUDA targets into a header for module.cpp.

    A header read by one source, rather than a -D flag on every source, keeps a change of
    architectures from recompiling the C++ that does not depend on them.
    """

    def build_extensions(self) -> None:
        targets = cuda_targets() if build_with_cuda() else []
        generated = os.path.join(os.path.abspath(self.build_temp), "generated")
        header = os.path.join(generated, "moe_ep_build_info.h")
        write_if_changed(header, f'#define MOE_EP_CUDA_TARGETS "{",".join(targets)}"\n')
        for ext in self.extensions:
            ext.include_dirs.append(generated)
        print(f"moe_ep: CUDA targets: {','.join(targets) or 'none (CPU-only build)'}")
        super().build_extensions()


def extension():
    sources = (
        core_sources() + relative_glob("csrc/ops/*.cpp") + relative_glob("csrc/bindings/*.cpp")
    )
    include_dirs = [os.path.join(ROOT, "csrc")]
    # Python's CFLAGS carry -g; debug info more than doubles the time to compile the sources
    # that include ATen and is of no use in a release build.
    cxx_flags = ["-O3", "-g0", "-fvisibility=hidden"]
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
    sources += relative_glob("csrc/ops/cuda/*.cpp") + relative_glob("csrc/ops/kernels/*.cu")
    return cpp_extension.CUDAExtension(
        "moe_ep._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("MOE_EP_WITH_CUDA", "1")],
        libraries=["cublas"],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
