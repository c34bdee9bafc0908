# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= demo_out

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch lies on this machine's disk; a looser pin would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# type stubs only: the real tensorrt wheel is a placeholder on PyPI
	$(PY) -m pip install -q --no-deps tensorrt-stubs
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
	$(VENV)/bin/ruff check janusflow_ref export runtime calibration benchmarks tests
	$(VENV)/bin/mypy runtime/trt_backend.py --ignore-missing-imports

bench: $(VENV)/.installed
	$(VENV)/bin/janusflow bench --size small --out bench_out

clean:
	rm -rf $(VENV) $(OUT) bench_out
