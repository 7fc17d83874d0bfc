// One extension module for every CPU kernel (engine/kernels.py builds and loads it).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "attention of every sequence of a step over the paged KV cache");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, times the weight");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += delta in place; returns RMSNorm(residual) * weight");
  m.def("rope_", &rope_, "rotary embedding (half-split layout) applied to q and k in place");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [T, 2F] gate/up projection");
}
