// The gated activations of the expert FFN, shared by the CPU op and the CUDA kernel.
#pragma once

namespace moe_ep::core {

// act(gate) * up, with act = SiLU (SwiGLU) or the exact erf GELU (GeGLU).
enum class Activation : int { kSiluAndMul = 0, kGeluAndMul = 1 };

}  // namespace moe_ep::core
