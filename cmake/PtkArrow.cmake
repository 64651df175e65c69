# Apache Arrow's C++ library (Arrow + Parquet) from the pyarrow wheel in .venv/, for reading Parquet
# datasets (datasets/parquet_reader.cpp), found the way cmake/PtkTorch.cmake finds LibTorch: headers
# from pyarrow/include, the versioned libraries (libarrow.so.N, libparquet.so.N) by full path so the
# build RPATH finds them where they are. requirements.txt pins pyarrow; no Python is run.
#
#   PTK_PARQUET  AUTO (default): on when the wheel is found; ON: required; OFF: no Parquet (ptk then
#                says so, with a conversion one-liner, when given a .parquet file).
# Defines PTK_HAVE_PARQUET and, when on, the interface target ptk_arrow. Arrow 26's headers need
# C++20: only the one file that includes them is compiled so (datasets/CMakeLists.txt).
set(PTK_PARQUET AUTO CACHE STRING "Read Parquet datasets with the pyarrow wheel's Arrow C++: AUTO, ON or OFF")
set_property(CACHE PTK_PARQUET PROPERTY STRINGS AUTO ON OFF)
set(PTK_HAVE_PARQUET OFF)
if(NOT PTK_PARQUET STREQUAL "OFF")
  get_filename_component(_ptk_site ${PTK_TORCH_DIR} DIRECTORY)  # the same site-packages as torch
  set(_ptk_pa ${_ptk_site}/pyarrow)
  file(GLOB _ptk_arrow_lib ${_ptk_pa}/libarrow.so.[0-9]*)
  file(GLOB _ptk_parquet_lib ${_ptk_pa}/libparquet.so.[0-9]*)
  if(EXISTS ${_ptk_pa}/include/parquet/arrow/reader.h AND _ptk_arrow_lib AND _ptk_parquet_lib)
    list(GET _ptk_arrow_lib 0 _ptk_arrow_lib)
    list(GET _ptk_parquet_lib 0 _ptk_parquet_lib)
    # The C++11 ABI, as torch and Debian's libraries: std::__cxx11 names in its exports.
    file(STRINGS ${_ptk_parquet_lib} _ptk_pa_abi REGEX "__cxx11" LIMIT_COUNT 1)
    if(NOT _ptk_pa_abi)
      message(FATAL_ERROR "ptk: ${_ptk_parquet_lib} uses the old C++ ABI; ptk needs _GLIBCXX_USE_CXX11_ABI=1. "
        "Run scripts/setup.sh (pyarrow from PyPI has the new ABI) or configure with -DPTK_PARQUET=OFF.")
    endif()
    add_library(ptk_arrow INTERFACE)
    target_include_directories(ptk_arrow SYSTEM INTERFACE ${_ptk_pa}/include)
    target_link_libraries(ptk_arrow INTERFACE ${_ptk_parquet_lib} ${_ptk_arrow_lib})
    set(PTK_HAVE_PARQUET ON)
    file(STRINGS ${_ptk_pa}/include/arrow/util/config.h _ptk_av REGEX "define ARROW_VERSION_STRING")
    string(REGEX REPLACE ".*\"(.*)\".*" "\\1" _ptk_av "${_ptk_av}")
    message(STATUS "ptk: Parquet through Arrow ${_ptk_av} from ${_ptk_pa}")
  elseif(PTK_PARQUET STREQUAL "ON")
    message(FATAL_ERROR "ptk: PTK_PARQUET=ON but ${_ptk_pa} has no Arrow C++ headers and libraries "
      "(include/parquet/arrow/reader.h, libarrow.so.N, libparquet.so.N). Run scripts/setup.sh (requirements.txt pins pyarrow).")
  else()
    message(STATUS "ptk: no pyarrow in ${_ptk_site}: Parquet datasets are not readable (scripts/setup.sh installs it)")
  endif()
endif()
