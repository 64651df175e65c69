# Finds every dependency and checks the combinations that would otherwise fail at link or run time.
# Not a place for targets: those live in each folder's CMakeLists.txt.

find_package(Threads REQUIRED)

# --- LibTorch (cmake/PtkTorch.cmake: the PyPI wheel in .venv/, its CUDA and OpenMP) -------------
include(PtkTorch)

# --- Arrow + Parquet from the pyarrow wheel (cmake/PtkArrow.cmake): Parquet datasets ----------------
include(PtkArrow)

# Gloo's headers for c10d's ProcessGroupGloo.hpp: the wheel compiles Gloo into libtorch_cpu but ships
# none of its headers; Debian's libgloo-dev has them (ptk only names Gloo's device type through
# ProcessGroupGloo's own static functions, so their older snapshot is enough). Without them,
# distributed CPU runs are unavailable.
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
