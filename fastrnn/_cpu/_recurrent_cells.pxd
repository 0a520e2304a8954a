# cython: language_level=3
"""The recurrent cells (fastrnn/_cpu/_recurrent_cells.h): one declaration for every module that
runs them (the training engine, recurrent.pyx, and the prepared inference step, inference.pyx)."""

cdef extern from "_recurrent_cells.h":
    int FR_LSTM, FR_GRU, FR_RNN_TANH, FR_RNN_RELU
    int fr_isa_supported(int isa) noexcept nogil
    void fr_cell_fwd_f(int isa, int cell, Py_ssize_t rows, float* g, const float* hw,
                       const float* b1, const float* b2, const float* hp, const float* cp,
                       float* hn, float* cn, float* sv, Py_ssize_t H, Py_ssize_t bs,
                       Py_ssize_t u0, Py_ssize_t u1) noexcept nogil
    void fr_cell_fwd_d(int isa, int cell, Py_ssize_t rows, double* g, const double* hw,
                       const double* b1, const double* b2, const double* hp, const double* cp,
                       double* hn, double* cn, double* sv, Py_ssize_t H, Py_ssize_t bs,
                       Py_ssize_t u0, Py_ssize_t u1) noexcept nogil
    void fr_cell_bwd_f(int isa, int cell, Py_ssize_t rows, const float* acts, const float* cp,
                       const float* cn, const float* hp, const float* dyt, float* dh, float* dc,
                       float* dax, float* dah, Py_ssize_t H, Py_ssize_t bs, Py_ssize_t u0,
                       Py_ssize_t u1) noexcept nogil
    void fr_cell_bwd_d(int isa, int cell, Py_ssize_t rows, const double* acts, const double* cp,
                       const double* cn, const double* hp, const double* dyt, double* dh,
                       double* dc, double* dax, double* dah, Py_ssize_t H, Py_ssize_t bs,
                       Py_ssize_t u0, Py_ssize_t u1) noexcept nogil
    void fr_activations_f(int isa, int tanh_, float* v, Py_ssize_t n) noexcept nogil
