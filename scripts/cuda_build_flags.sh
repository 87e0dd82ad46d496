# Sourced by scripts/build_cuda.sh and scripts/gpu_check.sh: the pip / scikit-build flags of a CUDA
# build of salr (warnings as errors, ptxas -v, the real nvcc, the toolkit root).
#   salr_cuda_pip_flags BUILD_DIR [NVRTC_LIBRARY]   -> sets the array SALR_CUDA_PIP_FLAGS
# Needs CUDA_HOME and CUDACXX set.
salr_cuda_pip_flags() {
  SALR_CUDA_PIP_FLAGS=(
    -C build-dir="$1"
    -C cmake.define.SALR_WITH_CUDA=ON
    -C cmake.define.SALR_WARNINGS_AS_ERRORS=ON
    -C cmake.define.SALR_PTXAS_VERBOSE=ON
    -C cmake.define.CMAKE_CUDA_COMPILER="$CUDACXX"
    -C cmake.define.CUDAToolkit_ROOT="$CUDA_HOME"
    -C cmake.define.CUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME"
  )
  if [ -n "${2:-}" ]; then
    SALR_CUDA_PIP_FLAGS+=(-C cmake.define.CUDA_nvrtc_LIBRARY="$2")
  fi
}
