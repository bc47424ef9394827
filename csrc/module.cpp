// The Python module rca_fast._C.  Importing it runs the TORCH_LIBRARY registration in ops.cpp
// (torch.ops.rca_fast.ema_update_ / kmeans); the module itself only says how it was built.
#include <torch/extension.h>

#include "rca_fast.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rca_fast compiled ops: in-place EMA bank update and batched k-means (CPU twin + CUDA)";
  m.attr("with_cuda") = rca_fast::built_with_cuda();
}
