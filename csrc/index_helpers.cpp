#include <pybind11/pybind11.h>
namespace py = pybind11;
void bind_index_helpers(py::module_ &m) {}
