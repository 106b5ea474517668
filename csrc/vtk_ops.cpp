// The vtk op schemas, written once. Each backend registers kernels for its dispatch key
// (cpu/*.cpp, cuda/*_glue.cpp); Python adds fake kernels and the Triton CUDA kernels
// (vtkernels/ops.py). Keep in sync with vtkernels/_schemas.py (a test compares them).
#ifndef VTK_NO_PYTHON
#include <Python.h>
#endif
#include <torch/library.h>

#ifndef VTK_NO_PYTHON  // CMake's libtorch-only build (CMakeLists.txt) defines it
extern "C" {
// Lets `import vtkernels._C` load this library without pybind; the ops register themselves
// with the dispatcher when the shared object is loaded.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(vtk, m) {
  m.def("cls_attention(Tensor q, Tensor k, int num_heads, float? scale=None) -> Tensor");
  m.def("attention_received(Tensor q, Tensor k, int num_heads, float? scale=None, bool has_cls=True) -> Tensor");
  m.def("fopru_significance(Tensor q, Tensor k, int num_heads, float? scale=None, bool has_cls=True) -> Tensor");
  m.def("topk_indices(Tensor scores, int k) -> Tensor");
  m.def("gather_tokens(Tensor x, Tensor indices) -> Tensor");
  m.def("fopru_select(Tensor x, Tensor scores, int keep, str strategy=\"rank\", int grid_width=0) -> (Tensor, Tensor)");
  m.def("vispruner_select(Tensor x, Tensor scores, int keep, float important_ratio=0.5, int dedup_step=8) -> Tensor");
  m.def("prumerge(Tensor x, Tensor keys, Tensor scores, int knn=32, bool plus=False, bool per_sample=True) -> (Tensor, Tensor)");
  m.def("attention_received_varlen(Tensor q, Tensor k, Tensor cu_seqlens, int num_heads, float? scale=None) -> Tensor");
  m.def("glimpse_logits(Tensor q, Tensor k, float? scale=None, Tensor? key_mask=None, bool log_softmax=False) -> Tensor");
  m.def("gather_cache(Tensor[] tensors, Tensor index) -> Tensor[]");
}
