// The Python modules todi_ext._C (schemas, CPU kernels) and todi_ext._C_cuda
// (CUDA kernels; CMake compiles this file for each, TODI_EXT_MODULE naming
// it): empty. Loading one runs the op registrations of its other files
// (STABLE_TORCH_LIBRARY, STABLE_TORCH_LIBRARY_IMPL); build facts come from the generated
// _build_config.py and the todi_ext::cpu_kernel_capability op. Written
// against the limited C API (abi3, Python >= 3.10), so one build serves every
// Python from 3.10 on.
#ifndef Py_LIMITED_API  // CMake's USE_SABI 3.10 defines it too
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>

#ifndef TODI_EXT_MODULE
#error "compile with -DTODI_EXT_MODULE=<the module's name>"
#endif
#define TODI_EXT_STRINGIFY(x) #x
#define TODI_EXT_NAME(x) TODI_EXT_STRINGIFY(x)
#define TODI_EXT_CONCAT(a, b) a##b
#define TODI_EXT_INIT(name) TODI_EXT_CONCAT(PyInit_, name)

static PyModuleDef todi_ext_module = {
    PyModuleDef_HEAD_INIT,
    TODI_EXT_NAME(TODI_EXT_MODULE),
    "todi_ext compiled kernels; the ops are registered under torch.ops.todi_ext",
    -1,
    nullptr,
};

PyMODINIT_FUNC TODI_EXT_INIT(TODI_EXT_MODULE)() { return PyModule_Create(&todi_ext_module); }
