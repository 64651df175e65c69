# LibTorch from the PyPI wheel torch==2.11.0 (CUDA 13), the one LibTorch ptk builds against on every
# machine: scripts/setup.sh installs it into the project's .venv/; a GPU machine with that torch
# already installed passes -DPTK_TORCH_DIR=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))').
#
# Defines the interface target ptk_torch (headers, libraries, OpenMP) and PTK_TORCH_VERSION,
# PTK_TORCH_CUDA_VERSION, PTK_CUDA, PTK_NCCL. It does not use the wheel's TorchConfig.cmake: on a CUDA
# wheel that one insists on a CUDA toolkit (nvcc) even where nothing is compiled by nvcc, and a
# CPU-only user has none. Everything CUDA code needs to compile comes from PyPI: the wheel's own
# dependencies (nvidia/cu13/include: the CUDA runtime headers; nvidia/nccl/include: nccl.h) and the
# two extras requirements.txt adds (cuda-toolkit[crt,cccl]: crt/host_defines.h, nv/target).
#
#   PTK_CUDA  AUTO (default): on when the wheel has CUDA; ON: required; OFF: a CPU-only build.
#   PTK_NCCL  AUTO (default): on with PTK_CUDA; ON: required; OFF: off. On means nccl.h must be found.

set(PTK_TORCH_REQUIRED_VERSION 2.11.0)
get_filename_component(_ptk_root ${CMAKE_CURRENT_LIST_DIR}/.. ABSOLUTE)
set(PTK_TORCH_DIR "" CACHE PATH "torch package folder (site-packages/torch); default: the one in .venv/")
set(PTK_CUDA AUTO CACHE STRING "Compile and link ptk's CUDA code paths: AUTO (when the wheel has CUDA), ON or OFF")
set(PTK_NCCL AUTO CACHE STRING "NCCL process groups (needs PTK_CUDA): AUTO, ON or OFF")
set_property(CACHE PTK_CUDA PROPERTY STRINGS AUTO ON OFF)
set_property(CACHE PTK_NCCL PROPERTY STRINGS AUTO ON OFF)

function(ptk_torch_fail)
  string(JOIN "" _what ${ARGN})
  message(FATAL_ERROR "ptk: ${_what}")
endfunction()

# Where the torch is, when -DPTK_TORCH_DIR is not given: the older spelling
# -DCMAKE_PREFIX_PATH=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)') still selects
# that torch; otherwise the one in .venv/.
if(NOT PTK_TORCH_DIR)
  set(_ptk_torch_dir "")
  foreach(_p IN LISTS CMAKE_PREFIX_PATH)
    if(NOT _ptk_torch_dir AND EXISTS ${_p}/Torch/TorchConfig.cmake AND EXISTS ${_p}/../../version.py)
      get_filename_component(_ptk_torch_dir ${_p}/../.. ABSOLUTE)
    endif()
  endforeach()
  if(NOT _ptk_torch_dir)
    file(GLOB _ptk_torch_candidates ${_ptk_root}/.venv/lib/python3*/site-packages/torch/version.py)
    if(NOT _ptk_torch_candidates)
      ptk_torch_fail("no LibTorch: ${_ptk_root}/.venv has no torch (the venv is missing or incomplete). "
        "Run scripts/setup.sh, or pass -DPTK_TORCH_DIR=<site-packages>/torch.")
    endif()
    list(GET _ptk_torch_candidates 0 _ptk_version_py)
    get_filename_component(_ptk_torch_dir ${_ptk_version_py} DIRECTORY)
  endif()
  set(PTK_TORCH_DIR ${_ptk_torch_dir} CACHE PATH "torch package folder (site-packages/torch)" FORCE)
endif()
if(NOT EXISTS ${PTK_TORCH_DIR}/version.py OR NOT EXISTS ${PTK_TORCH_DIR}/include/torch/csrc/api/include/torch/torch.h)
  ptk_torch_fail("${PTK_TORCH_DIR} is not a torch wheel's package folder (no version.py or include/torch/csrc/api/include/torch/torch.h). "
    "Run scripts/setup.sh, or point -DPTK_TORCH_DIR at <site-packages>/torch.")
endif()

# Version and CUDA of the wheel, from its version.py (no Python is run).
file(STRINGS ${PTK_TORCH_DIR}/version.py _ptk_v REGEX "^__version__")
file(STRINGS ${PTK_TORCH_DIR}/version.py _ptk_c REGEX "^cuda")
string(REGEX MATCH "'([^']+)'" _ "${_ptk_v}")
set(PTK_TORCH_FULL_VERSION ${CMAKE_MATCH_1})
string(REGEX REPLACE "\\+.*" "" PTK_TORCH_VERSION "${PTK_TORCH_FULL_VERSION}")
set(PTK_TORCH_CUDA_VERSION "")
if(_ptk_c MATCHES "'([0-9.]+)'")
  set(PTK_TORCH_CUDA_VERSION ${CMAKE_MATCH_1})
endif()
if(NOT PTK_TORCH_VERSION VERSION_EQUAL PTK_TORCH_REQUIRED_VERSION)
  ptk_torch_fail("torch ${PTK_TORCH_FULL_VERSION} in ${PTK_TORCH_DIR}, but ptk is built against torch==${PTK_TORCH_REQUIRED_VERSION}. "
    "Run scripts/setup.sh (installs the pinned wheel into .venv/) or point -DPTK_TORCH_DIR at a torch ${PTK_TORCH_REQUIRED_VERSION}.")
endif()

set(_ptk_lib ${PTK_TORCH_DIR}/lib)
foreach(_l torch torch_cpu c10)
  if(NOT EXISTS ${_ptk_lib}/lib${_l}.so)
    ptk_torch_fail("${_ptk_lib}/lib${_l}.so is missing: the torch wheel is incomplete. Run scripts/setup.sh.")
  endif()
endforeach()
# The C++11 ABI (Debian's Boost, abseil and GoogleTest use it): libc10 exports std::__cxx11 names then.
file(STRINGS ${_ptk_lib}/libc10.so _ptk_abi REGEX "__cxx11" LIMIT_COUNT 1)
if(NOT _ptk_abi)
  ptk_torch_fail("${_ptk_lib}/libc10.so uses the old C++ ABI (_GLIBCXX_USE_CXX11_ABI=0), but Debian's Boost, abseil "
    "and GoogleTest use the new one. Run scripts/setup.sh (torch==${PTK_TORCH_REQUIRED_VERSION} from PyPI has the new ABI).")
endif()

# --- CUDA and NCCL: headers from the wheel's NVIDIA dependencies, a CUDA toolkit as the fallback -----
get_filename_component(_ptk_site ${PTK_TORCH_DIR} DIRECTORY)
set(_ptk_cuda_wanted ${PTK_CUDA})
if(PTK_CUDA STREQUAL "AUTO")
  set(_ptk_cuda_wanted OFF)
  if(PTK_TORCH_CUDA_VERSION)
    set(_ptk_cuda_wanted ON)
  endif()
endif()
if(_ptk_cuda_wanted)
  if(NOT PTK_TORCH_CUDA_VERSION)
    ptk_torch_fail("PTK_CUDA=ON but torch ${PTK_TORCH_FULL_VERSION} in ${PTK_TORCH_DIR} has no CUDA. "
      "Run scripts/setup.sh (the PyPI wheel has CUDA 13) or configure with -DPTK_CUDA=OFF.")
  endif()
  string(REGEX MATCH "^[0-9]+" _ptk_cuda_major ${PTK_TORCH_CUDA_VERSION})
  find_path(PTK_CUDA_INCLUDE cuda_runtime_api.h
    HINTS ${_ptk_site}/nvidia/cu${_ptk_cuda_major}/include ${_ptk_site}/nvidia/cuda_runtime/include
          $ENV{CUDA_HOME}/include /usr/local/cuda/include NO_DEFAULT_PATH)
  find_library(PTK_CUDART NAMES libcudart.so.${_ptk_cuda_major} cudart NAMES_PER_DIR
    HINTS ${_ptk_site}/nvidia/cu${_ptk_cuda_major}/lib ${_ptk_site}/nvidia/cuda_runtime/lib
          $ENV{CUDA_HOME}/lib64 /usr/local/cuda/lib64 NO_DEFAULT_PATH)
  if(NOT PTK_CUDA_INCLUDE OR NOT PTK_CUDART OR NOT EXISTS ${_ptk_lib}/libtorch_cuda.so)
    ptk_torch_fail("PTK_CUDA needs the CUDA ${PTK_TORCH_CUDA_VERSION} runtime headers and library (cuda_runtime_api.h, libcudart) "
      "and libtorch_cuda.so (found include='${PTK_CUDA_INCLUDE}' cudart='${PTK_CUDART}'). Run scripts/setup.sh "
      "(the wheel's nvidia-cuda-runtime dependency ships them) or configure with -DPTK_CUDA=OFF.")
  endif()
  # Headers the runtime's include others from, which torch's dependencies leave out.
  foreach(_h crt/host_defines.h nv/target)
    if(NOT EXISTS ${PTK_CUDA_INCLUDE}/${_h})
      ptk_torch_fail("${PTK_CUDA_INCLUDE} has no ${_h}. Run scripts/setup.sh (requirements.txt's "
        "cuda-toolkit[crt,cccl] ships it) or configure with -DPTK_CUDA=OFF.")
    endif()
  endforeach()
endif()
set(_ptk_nccl_wanted ${PTK_NCCL})
if(PTK_NCCL STREQUAL "AUTO")
  set(_ptk_nccl_wanted ${_ptk_cuda_wanted})
endif()
if(_ptk_nccl_wanted)
  if(NOT _ptk_cuda_wanted)
    ptk_torch_fail("PTK_NCCL=ON needs PTK_CUDA.")
  endif()
  find_path(PTK_NCCL_INCLUDE nccl.h HINTS ${_ptk_site}/nvidia/nccl/include $ENV{CUDA_HOME}/include
            /usr/local/cuda/include /usr/include NO_DEFAULT_PATH)
  if(NOT PTK_NCCL_INCLUDE)
    # The CUDA wheel depends on nvidia-nccl-cu13: without nccl.h the install is broken, and leaving
    # NCCL out quietly would let a compile error in the NCCL path pass unseen.
    ptk_torch_fail("nccl.h was not found (the nvidia-nccl-cu13 wheel, a dependency of torch, ships it). "
      "Run scripts/setup.sh, or configure with -DPTK_NCCL=OFF.")
  endif()
endif()
# From here on PTK_CUDA / PTK_NCCL are plain booleans for the rest of the build.
set(PTK_CUDA ${_ptk_cuda_wanted})
set(PTK_NCCL ${_ptk_nccl_wanted})

# --- OpenMP: the wheel's own libgomp --------------------------------------------------------------
# ATen's at::parallel_for runs its `#pragma omp parallel` in the caller's translation unit, so ptk
# compiles with -fopenmp; it links the libgomp the wheel bundles (torch/lib/libgomp.so.1), not the
# system one: one OpenMP runtime, one thread pool, one OMP_NUM_THREADS for LibTorch and ptk alike.
if(NOT EXISTS ${_ptk_lib}/libgomp.so.1)
  ptk_torch_fail("${_ptk_lib}/libgomp.so.1 is missing: this torch does not bundle GNU OpenMP. Run scripts/setup.sh.")
endif()

add_library(ptk_torch INTERFACE)
target_include_directories(ptk_torch SYSTEM INTERFACE ${PTK_TORCH_DIR}/include
                           ${PTK_TORCH_DIR}/include/torch/csrc/api/include)
target_compile_options(ptk_torch INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
target_compile_definitions(ptk_torch INTERFACE PTK_TORCH_CUDA=$<BOOL:${PTK_CUDA}>)
# libstdc++ first: the wheel is built with a newer GCC against an older libstdc++ and its libtorch.so
# exports the parts it linked statically (83 std::filesystem / std::chrono functions). Loaded before
# the system's libstdc++, those copies win symbol lookup for the whole process, and
# std::filesystem::remove_all called through them jumps to a null pointer. With libstdc++.so.6 ahead
# of libtorch.so among the binary's NEEDED entries, every std:: symbol resolves to the system's.
# Full paths: CMake puts their folders in the build RPATH, so the binaries find them where they are.
target_link_libraries(ptk_torch INTERFACE "-Wl,--push-state,--no-as-needed" stdc++ "-Wl,--pop-state"
                      ${_ptk_lib}/libtorch.so ${_ptk_lib}/libtorch_cpu.so ${_ptk_lib}/libc10.so
                      ${_ptk_lib}/libgomp.so.1 Threads::Threads)
if(PTK_CUDA)
  target_include_directories(ptk_torch SYSTEM INTERFACE ${PTK_CUDA_INCLUDE})
  # libtorch_cuda registers the CUDA kernels and hooks when it is loaded; nothing references it by
  # name, so it must not be dropped by --as-needed (Ubuntu's default).
  target_link_libraries(ptk_torch INTERFACE "-Wl,--push-state,--no-as-needed" ${_ptk_lib}/libtorch_cuda.so
                        "-Wl,--pop-state" ${_ptk_lib}/libc10_cuda.so ${PTK_CUDART})
endif()
if(PTK_NCCL)
  target_include_directories(ptk_torch SYSTEM INTERFACE ${PTK_NCCL_INCLUDE})
endif()

message(STATUS "ptk: LibTorch ${PTK_TORCH_FULL_VERSION} from ${PTK_TORCH_DIR}; CUDA=${PTK_CUDA}"
  " (wheel: ${PTK_TORCH_CUDA_VERSION}) NCCL=${PTK_NCCL}; OpenMP: ${_ptk_lib}/libgomp.so.1")
