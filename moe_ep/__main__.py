"""`python -m moe_ep`: what this installation offers (version, CUDA build, ops, command lines)."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil

import torch

import moe_ep
from moe_ep.cuda_arch import built_targets


def op_schemas() -> list[str]:
    """The schemas of torch.ops.moe_ep, as registered by moe_ep._C."""
    # torch has no public listing of a namespace's operators; this is the dispatcher's own.
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("moe_ep::"))
    schemas = []
    for name in names:
        op_name, _, overload = name.partition("::")[2].partition(".")
        packet = getattr(torch.ops.moe_ep, op_name)
        schemas.append(str(getattr(packet, overload or "default")._schema))
    return schemas


def command_lines() -> list[tuple[str, str]]:
    """(module, first paragraph of its docstring) for each moe_ep module that runs as a script."""
    found = []
    for module in pkgutil.iter_modules(moe_ep.__path__):
        name = f"moe_ep.{module.name}"
        if module.ispkg or module.name.startswith("_"):
            continue
        with open(importlib.util.find_spec(name).origin) as f:
            source = f.read()
        if 'if __name__ == "__main__":' in source:
            doc = ast.get_docstring(ast.parse(source)) or ""
            found.append((name, " ".join(doc.split("\n\n")[0].split())))
    return found


def summary() -> str:
    targets = built_targets()
    if moe_ep._C.with_cuda:
        kernels = f"built for {', '.join(targets)}"
    else:
        kernels = "not built (CPU-only build: CPU kernels only)"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    lines = [
        f"moe_ep {moe_ep.__version__} at {moe_ep.__path__[0]}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"CUDA kernels: {kernels}",
        f"GPUs visible: {', '.join(gpus) if gpus else 'none'}",
        "",
        "Operators (torch.ops.moe_ep; typed wrappers in moe_ep.ops and moe_ep.dispatcher):",
        *(f"  {schema}" for schema in op_schemas()),
        "",
        "Command lines (--help for options):",
        *(f"  python -m {name:<14} {doc}" for name, doc in command_lines()),
        "",
        f"Python API: {', '.join(f'moe_ep.{name}' for name in moe_ep.__all__)}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())
