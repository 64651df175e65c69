# Finds every dependency and checks the combinations that would otherwise fail at link or run time.
# Not a place for targets: those live in each folder's CMakeLists.txt.

find_package(Threads REQUIRED)

# --- LibTorch ---------------------------------------------------------------------------------
# CPU machines: Debian's libtorch-dev (1.13). GPU machines: the libtorch inside pip PyTorch 2.x,
#   cmake -DCMAKE_PREFIX_PATH=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)') -DPTK_CUDA=ON
if(PTK_CUDA)
  find_package(CUDAToolkit QUIET)
  if(NOT CUDAToolkit_FOUND)
    message(FATAL_ERROR "PTK_CUDA=ON but no CUDA toolkit was found.\n"
      "---> HINT: install the CUDA Toolkit (nvcc, cudart) matching your PyTorch build, or put its bin/ on PATH, "
      "or configure with -DPTK_CUDA=OFF for a CPU build.")
  endif()
  enable_language(CUDA)
endif()
find_package(Torch QUIET)
if(NOT Torch_FOUND)
  message(FATAL_ERROR "LibTorch was not found.\n"
    "---> HINT: on Debian run scripts/setup.sh (installs libtorch-dev); with a pip PyTorch pass "
    "-DCMAKE_PREFIX_PATH=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')")
endif()
# Debian's TorchConfig adds no C++ flags; pip's adds -D_GLIBCXX_USE_CXX11_ABI=N. Check it against ours:
# Debian's Boost, abseil and GoogleTest are built with the new ABI (1).
set(PTK_TORCH_ABI 1)
foreach(flag IN LISTS TORCH_CXX_FLAGS)
  if(flag MATCHES "_GLIBCXX_USE_CXX11_ABI=([01])")
    set(PTK_TORCH_ABI ${CMAKE_MATCH_1})
  endif()
endforeach()
if(TORCH_CXX_FLAGS MATCHES "_GLIBCXX_USE_CXX11_ABI=0")
  set(PTK_TORCH_ABI 0)
endif()
if(NOT PTK_TORCH_ABI EQUAL 1)
  message(FATAL_ERROR "This libtorch uses the old C++ ABI (_GLIBCXX_USE_CXX11_ABI=0; "
    "torch._C._GLIBCXX_USE_CXX11_ABI is False), but Debian's Boost, abseil and GoogleTest use the new one: "
    "linking would fail with undefined std::string symbols.\n"
    "---> HINT: use PyTorch >= 2.7 (built with the C++11 ABI) or a cxx11-abi libtorch archive.")
endif()
if(PTK_CUDA AND NOT TORCH_CUDA_LIBRARIES AND NOT TARGET torch_cuda)
  message(FATAL_ERROR "PTK_CUDA=ON but this libtorch has no CUDA support (${Torch_DIR}).\n"
    "---> HINT: point CMAKE_PREFIX_PATH at a CUDA build of PyTorch.")
endif()
if(PTK_NCCL AND NOT PTK_CUDA)
  message(FATAL_ERROR "PTK_NCCL=ON needs PTK_CUDA=ON.")
endif()
if(Torch_VERSION)
  set(PTK_TORCH_VERSION ${Torch_VERSION})
else()
  set(PTK_TORCH_VERSION "unknown")
endif()
message(STATUS "ptk: LibTorch ${PTK_TORCH_VERSION} from ${Torch_DIR}; CUDA=${PTK_CUDA} NCCL=${PTK_NCCL}")

# OpenMP: ATen's at::parallel_for is a header template whose `#pragma omp parallel` runs in the
# caller's translation unit; compiled without -fopenmp it silently runs on one thread. Every ptk
# target that includes LibTorch gets it (ptk_library / ptk_test TORCH, the shared PCH).
find_package(OpenMP REQUIRED COMPONENTS CXX)

# c10d Gloo headers (Debian: libgloo-dev). Without them distributed CPU runs are unavailable.
find_path(PTK_GLOO_INCLUDE gloo/config.h)
if(PTK_GLOO_INCLUDE)
  set(PTK_HAVE_GLOO ON)
else()
  set(PTK_HAVE_GLOO OFF)
  message(WARNING "gloo headers not found (Debian: libgloo-dev): distributed CPU training disabled")
endif()

# --- the rest ----------------------------------------------------------------------------------
find_package(Boost 1.74 REQUIRED COMPONENTS program_options)
find_package(absl REQUIRED)
find_package(RapidJSON QUIET)
find_path(PTK_RAPIDJSON_INCLUDE rapidjson/document.h REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
pkg_check_modules(UTF8PROC REQUIRED IMPORTED_TARGET libutf8proc)
find_path(PTK_HTTPLIB_INCLUDE httplib.h)
if(PTK_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
