// Meta-device kernels for the ATen ops whose meta ("shapes only") implementation lives in Python
// (torch/_meta_registrations.py) and so is missing from LibTorch in C++. Tests that run a stage step
// on the `meta` device call register_meta_kernels() first: then a step fails only for what the
// meta device is meant to catch, a tensor made on the CPU (or read back to the host) while the model
// is elsewhere. Each kernel computes only the output's shape and dtype, as its Python twin does.
#pragma once

namespace ptk::test {

// Idempotent; safe to call from every test.
void register_meta_kernels();

}  // namespace ptk::test
