# Small helpers so each folder's CMakeLists.txt stays a few lines.
#   ptk_library(NAME SOURCES a.cpp b.cpp DEPS other_lib [TORCH])
#   ptk_test(NAME SOURCES t.cpp DEPS lib LABELS unit [TIMEOUT s])
# TORCH marks a library whose .cpp files include LibTorch: it gets the shared precompiled header
# and OpenMP (at::parallel_for needs -fopenmp where it is called; see PtkDeps.cmake).

set(PTK_ROOT ${CMAKE_CURRENT_LIST_DIR}/..)

# Debian's OpenBLAS 0.3.21 falls back to its Prescott (SSE3) kernels on CPUs it does not know, ~4x
# slower; `ptk` names the kernel family itself (apps/ptk/main.cpp). Test binaries load OpenBLAS
# directly, so ctest gives them the same choice for the machine that builds and tests.
set(PTK_TEST_BLAS_ENV "")
if(EXISTS /proc/cpuinfo)
  file(STRINGS /proc/cpuinfo _ptk_cpu_flags REGEX "^flags" LIMIT_COUNT 1)
  set(_ptk_cpu_flags "${_ptk_cpu_flags} ")
  if(_ptk_cpu_flags MATCHES " avx512f " AND _ptk_cpu_flags MATCHES " avx512bw " AND
     _ptk_cpu_flags MATCHES " avx512dq " AND _ptk_cpu_flags MATCHES " avx512vl ")
    set(PTK_TEST_BLAS_ENV ";OPENBLAS_CORETYPE=SkylakeX")
  elseif(_ptk_cpu_flags MATCHES " avx2 " AND _ptk_cpu_flags MATCHES " fma ")
    set(PTK_TEST_BLAS_ENV ";OPENBLAS_CORETYPE=Haswell")
  endif()
endif()

function(ptk_apply_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter)
endfunction()

# One precompiled header with LibTorch, reused by every torch-using target (CMake REUSE_FROM).
function(ptk_make_pch)
  if(TARGET ptk_pch)
    return()
  endif()
  add_library(ptk_pch STATIC ${PTK_ROOT}/core/runtime/pch.cpp)
  target_link_libraries(ptk_pch PUBLIC ${TORCH_LIBRARIES} OpenMP::OpenMP_CXX)
  target_include_directories(ptk_pch PUBLIC ${PTK_ROOT})
  target_precompile_headers(ptk_pch PRIVATE ${PTK_ROOT}/core/runtime/pch.h)
endfunction()

function(ptk_library name)
  cmake_parse_arguments(A "TORCH" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${A_SOURCES})
  target_include_directories(${name} PUBLIC ${PTK_ROOT})
  target_link_libraries(${name} PUBLIC ${A_DEPS} Threads::Threads)
  ptk_apply_warnings(${name})
  if(A_TORCH)
    ptk_make_pch()
    target_link_libraries(${name} PUBLIC ${TORCH_LIBRARIES} OpenMP::OpenMP_CXX)
    target_precompile_headers(${name} REUSE_FROM ptk_pch)
  endif()
endfunction()

function(ptk_test name)
  cmake_parse_arguments(A "TORCH" "TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${A_SOURCES})
  target_link_libraries(${name} PRIVATE ${A_DEPS} ptk_test_main)
  ptk_apply_warnings(${name})
  if(A_TORCH)
    ptk_make_pch()
    target_link_libraries(${name} PRIVATE ${TORCH_LIBRARIES} OpenMP::OpenMP_CXX)
    target_precompile_headers(${name} REUSE_FROM ptk_pch)
  endif()
  if(NOT A_LABELS)
    set(A_LABELS unit)
  endif()
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 300)
  endif()
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES LABELS "${A_LABELS}" TIMEOUT ${A_TIMEOUT}
    # Tests run side by side (ctest -j): spinning OpenMP threads would collapse (see apps/ptk/main.cpp).
    ENVIRONMENT "PTK_SOURCE_DIR=${PTK_ROOT};PTK_BINARY=$<TARGET_FILE:ptk>;PTK_SHARED_DIR=${PTK_ROOT}/../shared;OMP_WAIT_POLICY=PASSIVE${PTK_TEST_BLAS_ENV}")
endfunction()
