# Finds LibTorch, Eigen and nlohmann-json. Works with Debian's LibTorch 1.13
# (CPU) and with the CMake package shipped inside a PyTorch 2.x wheel.
find_package(Torch REQUIRED)
# The torch target carries -D_GLIBCXX_USE_CXX11_ABI; keep ours in line with it.
set(CMAKE_CXX_FLAGS "${CMAKE_CXX_FLAGS} ${TORCH_CXX_FLAGS}")

find_package(Eigen3 3.3 QUIET NO_MODULE)
if(NOT TARGET Eigen3::Eigen)
  find_path(EIGEN3_INCLUDE_DIR Eigen/Dense PATH_SUFFIXES eigen3 REQUIRED)
  add_library(Eigen3::Eigen INTERFACE IMPORTED)
  set_target_properties(Eigen3::Eigen PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${EIGEN3_INCLUDE_DIR}")
endif()

find_package(nlohmann_json 3 QUIET)
if(NOT TARGET nlohmann_json::nlohmann_json)
  find_path(NLOHMANN_JSON_INCLUDE_DIR nlohmann/json.hpp HINTS ${DUQUANT_EXTRA_INCLUDE})
  if(NOT NLOHMANN_JSON_INCLUDE_DIR)
    message(FATAL_ERROR "nlohmann-json not found: apt-get install nlohmann-json3-dev, "
                        "or pass -DDUQUANT_EXTRA_INCLUDE=<dir containing nlohmann/json.hpp>")
  endif()
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${NLOHMANN_JSON_INCLUDE_DIR}")
endif()

# CLI11 (header-only) for the command-line tools in tools/ (DUQUANT_BUILD_TOOLS).
find_package(CLI11 2 QUIET CONFIG)
if(NOT TARGET CLI11::CLI11)
  find_path(CLI11_INCLUDE_DIR CLI/CLI.hpp HINTS ${DUQUANT_EXTRA_INCLUDE})
  if(CLI11_INCLUDE_DIR)
    add_library(CLI11::CLI11 INTERFACE IMPORTED)
    set_target_properties(CLI11::CLI11 PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${CLI11_INCLUDE_DIR}")
  endif()
endif()

# Header-only dependencies used inside the library only (not part of its interface).
add_library(duquant_header_deps INTERFACE)
target_link_libraries(duquant_header_deps INTERFACE Eigen3::Eigen nlohmann_json::nlohmann_json)
