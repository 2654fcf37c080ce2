// The Python module todi_ext._C: empty. Loading it runs the op registrations
// of the other files (TORCH_LIBRARY); build facts come from the generated
// _build_config.py and the todi_ext::cpu_kernel_capability op. Written against
// the limited C API (abi3, Python >= 3.10), so one build serves every Python
// from 3.10 on.
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

static PyModuleDef todi_ext_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "todi_ext compiled kernels; the ops are registered under torch.ops.todi_ext",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&todi_ext_module); }
