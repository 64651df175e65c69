# Small helpers so each folder's CMakeLists.txt stays a few lines.
#   ptk_library(NAME SOURCES a.cpp b.cpp DEPS other_lib [TORCH])
#   ptk_test(NAME SOURCES t.cpp DEPS lib LABELS unit [TIMEOUT s])
# TORCH marks a library whose .cpp files include LibTorch: it gets the shared precompiled header
# and OpenMP (at::parallel_for needs -fopenmp where it is called; see PtkTorch.cmake).

set(PTK_ROOT ${CMAKE_CURRENT_LIST_DIR}/..)

function(ptk_apply_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter)
endfunction()

# One precompiled header with LibTorch, reused by every torch-using target (CMake REUSE_FROM).
function(ptk_make_pch)
  if(TARGET ptk_pch)
    return()
  endif()
  add_library(ptk_pch STATIC ${PTK_ROOT}/core/runtime/pch.cpp)
  target_link_libraries(ptk_pch PUBLIC ptk_torch)
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
    target_link_libraries(${name} PUBLIC ptk_torch)
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
    target_link_libraries(${name} PRIVATE ptk_torch)
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
    # An executable whose tests all skipped shows as "Skipped", not "Passed" (tests/support/test_main.cpp
    # prints the line; each skip's reason goes to PTK_TEST_RESULTS_DIR, summed by scripts/test_summary.sh).
    SKIP_REGULAR_EXPRESSION "ptk-test: every test of this executable skipped"
    # Tests run side by side (ctest -j): spinning OpenMP threads would collapse (see apps/ptk/main.cpp).
    ENVIRONMENT "PTK_SOURCE_DIR=${PTK_ROOT};PTK_BINARY=$<TARGET_FILE:ptk>;PTK_SHARED_DIR=${PTK_ROOT}/../shared;OMP_WAIT_POLICY=PASSIVE;PTK_TEST_RESULTS_DIR=${CMAKE_BINARY_DIR}/test-results")
endfunction()
