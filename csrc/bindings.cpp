// One pybind11 module, megalite._C; each source file registers its own functions.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_indexed_builder(py::module_ &m);  // indexed_builder.cpp
void bind_index_helpers(py::module_ &m);    // index_helpers.cpp
void bind_masked_helpers(py::module_ &m);   // masked_helpers.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "megalite C++ helpers: MMIDIDX token-file builder and GPT, BERT and T5 dataset index builders";
  bind_indexed_builder(m);
  bind_index_helpers(m);
  bind_masked_helpers(m);
}
