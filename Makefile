# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= demo_out
TRT_STUBS := 10.13.0.35.1

.PHONY: demo test lint typecheck bench gpu-check mutation clean triton-env

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch lies on this machine's disk; a looser pin would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev,serve]'
	# type stubs only (the real tensorrt wheel is a placeholder on PyPI); pinned: .ci/trt_stubs_overlay.py
	# patches this exact version's invalid lines and fails loudly if another version no longer matches
	$(PY) -m pip install -q --no-deps tensorrt-stubs==$(TRT_STUBS)
	touch $@

demo: $(VENV)/.installed
	rm -rf $(OUT) && mkdir -p $(OUT)
	$(VENV)/bin/janusflow make-tiny $(OUT)/tiny
	$(VENV)/bin/janusflow export --model $(OUT)/tiny --out $(OUT)/onnx --precision fp32,fp16
	$(VENV)/bin/janusflow verify --model $(OUT)/tiny --artifacts $(OUT)/onnx
	$(VENV)/bin/janusflow verify --model $(OUT)/tiny --artifacts $(OUT)/onnx --precision fp16
	$(PY) -c "from PIL import Image; Image.new('RGB', (320, 240), (200, 80, 40)).save('$(OUT)/input.png')"
	$(VENV)/bin/janusflow chat --model $(OUT)/tiny --backend ort --artifacts $(OUT)/onnx \
		--image $(OUT)/input.png --question "What is in this image?" --max-new-tokens 16
	$(VENV)/bin/janusflow generate --model $(OUT)/tiny --backend ort --artifacts $(OUT)/onnx \
		--prompt "A red fox in autumn leaves" --steps 30 --num-images 2 --out $(OUT)/fox.png
	$(VENV)/bin/janusflow generate --model $(OUT)/tiny --backend ort --artifacts $(OUT)/onnx --precision fp16 \
		--prompt "A red fox in autumn leaves" --steps 30 --num-images 2 --out $(OUT)/fox_fp16.png
	$(VENV)/bin/janusflow quality --model $(OUT)/tiny --artifacts $(OUT)/onnx --precision fp16 --quiet \
		--out $(OUT)/quality
	$(VENV)/bin/janusflow bench --model $(OUT)/tiny --artifacts $(OUT)/onnx --size tiny --contexts 64,256 \
		--steps 4 --quick --precision fp32,fp16 --out $(OUT)/bench

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow and not gpu"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check janusflow_trt janusflow_ref export runtime calibration benchmarks tests

typecheck: $(VENV)/.installed
	$(PY) .ci/trt_stubs_overlay.py build/typings
	MYPYPATH=build/typings $(VENV)/bin/mypy

# On an NVIDIA machine: swap onnxruntime for '.[gpu,tensorrt]' in the venv first (README "On a GPU").
gpu-check: $(VENV)/.installed
	$(VENV)/bin/janusflow gpu-check --out gpu_check

bench: $(VENV)/.installed
	$(VENV)/bin/janusflow bench --size small --out bench_out

# the bundled Triton server's environment (docs/triton.md): a venv with numpy<2 and nvidia-pytriton over this
# venv's packages; tests/test_triton.py makes it too when it is missing
triton-env: $(VENV)/.installed
	$(VENV)/bin/janusflow triton-env --env .venv-triton

# plants one-line numerics bugs in a temporary copy and runs the suite on each (slow; not in CI)
mutation: $(VENV)/.installed
	mkdir -p mutation_out
	$(PY) tools/mutants.py --baseline --json mutation_out/mutation.json

clean:
	rm -rf $(VENV) $(OUT) bench_out mutation_out .venv-triton
