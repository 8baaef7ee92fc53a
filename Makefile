# The two entry points of README.md. Everything else is plain CMake (see CMakePresets.json).
#   make demo   install what is missing, build, run the main job on the bundled model
#   make test   install what is missing, build (release + ASan/UBSan), run every test, then run each
#               libFuzzer target for FUZZ_SECONDS (clang build in build-fuzz; docs/reliability.md)
# In CI (CI=true) the CUDA part is compiled for one architecture only, to stay within time.

JOBS ?= $(shell nproc)
MODEL ?= models/tiny-llama
CUDA_ARCH_FLAG := $(if $(CI),-DCMAKE_CUDA_ARCHITECTURES=90a,)
FUZZ_SECONDS ?= 60
FUZZ_SEED ?= 1

.PHONY: demo test setup build build-asan build-fuzz test-release test-asan test-fuzz clean format

setup:
	@bash scripts/setup.sh

build: setup
	cmake --preset release $(CUDA_ARCH_FLAG)
	cmake --build --preset release -j $(JOBS)

build-asan: setup
	cmake --preset asan
	cmake --build --preset asan -j $(JOBS)

build-fuzz: setup
	cmake --preset fuzz
	cmake --build --preset fuzz -j $(JOBS)

demo: build
	bash scripts/demo.sh $(MODEL)

test-release: build
	ctest --preset release -j $(JOBS)

test-asan: build-asan
	ctest --preset asan -j $(JOBS)

# A fixed libFuzzer seed: CI's minute per target replays the same mutation sequence that a local
# clean-clone run with the same seed explored, so CI is reproducible; the exploration (other
# seeds, longer runs) is scripts/fuzz.sh by hand (docs/reliability.md). FUZZ_SEED=0: a random seed.
test-fuzz: build-fuzz
	JOBS=$(JOBS) bash scripts/fuzz.sh all $(FUZZ_SECONDS) $(if $(filter-out 0,$(FUZZ_SEED)),-seed=$(FUZZ_SEED))

test: test-release test-asan test-fuzz

format:
	clang-format -i $$(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')

clean:
	rm -rf build build-debug build-asan build-fuzz
