# The two commands of the README. Each one does all set-up on a fresh machine first.
# A machine that already has torch (a CUDA build on a GPU box, say) keeps it; otherwise the CPU build is installed.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup demo test test-oldest test-engines bench-micro bench-compare bench-compare-ratios bench-micro-smoke

# PIP_INSTALL_OPTS: extra pip options for convret's own install (test-oldest passes the oldest versions' pins)
PIP_INSTALL_OPTS ?=
# The install runs once per Python environment and PIP_INSTALL_OPTS (pip's no-op reinstall of the editable package
# with its native build takes about 45 s): a stamp under build/ records it, and the install runs again when the
# stamp is missing, when what the install builds or requires changed since (setup.py, pyproject.toml,
# CMakeLists.txt, csrc/), or when `convret` is not importable from this checkout's src/ in that environment.
SETUP_STAMP = build/setup-$(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1((sys.prefix + "|" + sys.argv[1]).encode()).hexdigest()[:12])' '$(PIP_INSTALL_OPTS)' 2>/dev/null || echo none).stamp
SETUP_INPUTS := setup.py pyproject.toml CMakeLists.txt csrc
setup:
	@stamp='$(SETUP_STAMP)'; \
	if test -f "$$stamp" && test -z "$$(find $(SETUP_INPUTS) -newer "$$stamp" 2>/dev/null | head -n 1)" && \
		$(PYTHON) -c 'import importlib.util as u, os, sys; s = u.find_spec("convret"); sys.exit(not (s and s.origin and os.path.realpath(s.origin).startswith(os.path.realpath("src") + os.sep)))' 2>/dev/null; \
	then echo "make setup: installed already ($$stamp)"; else \
		($(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0) && \
		$(PIP) install -q "setuptools>=70" && \
		$(PIP) install -q --no-build-isolation -e ".[test]" $(PIP_INSTALL_OPTS) && \
		mkdir -p build && touch "$$stamp"; \
	fi

# the main job: ChatRetriever's recipe on the tiny retriever and the bundled sample world (CPU, about 3 minutes on
# 2 cores; rerun: resumes). First the hard negatives, once: BM25 ranks 15-30 of the sample world's collection, for
# its two kinds of sessions (train.jsonl: UltraChat-style, whole passages as answers; train_triplets.jsonl:
# TopiOCQA-style, short answers), written under $(DEMO_DATA) (kept: `convret mine` never replaces a file without
# --overwrite, so a rerun skips it; an interrupted mine resumes). Then the training on both mixed (half the batches
# each), 4 negatives a turn, 1000 steps, learning rate 1e-3, temperature 0.1 (DEMO_TRAIN_FLAGS; tiny.yaml for the
# rest; mixing in the ad hoc queries, train_adhoc.jsonl, measured lower: README.md), and the evaluation beside the
# untrained model, the current utterance alone and the manual rewrite (--overwrite: the demo's own results, replaced
# when a rerun trained the model further). `convret bench recipe` measures each part of the recipe over seeds (README.md, "What the
# recipe is worth").
DEMO_DIR ?= runs/tiny
DEMO_DATA ?= runs/demo-data
SAMPLE_WORLD := src/convret/resources/sample_world
DEMO_MINE_FLAGS := --corpus $(SAMPLE_WORLD)/collection.jsonl --retriever bm25 --window 15-30 --num-negatives 4 \
	--seed 0 --no-progress
DEMO_TRAIN_FLAGS := --train_files $(DEMO_DATA)/train.bm25.jsonl:0.5,$(DEMO_DATA)/train_triplets.bm25.jsonl:0.5 \
	--num_negatives 4 --max_steps 1000 --learning_rate 0.001 --temperature 0.1
demo: setup
	@for name in train train_triplets; do \
		test -f $(DEMO_DATA)/$$name.bm25.jsonl || $(PYTHON) -m convret mine --train-file $(SAMPLE_WORLD)/$$name.jsonl \
			--output $(DEMO_DATA)/$$name.bm25.jsonl $(DEMO_MINE_FLAGS) || exit 1; \
	done
	$(PYTHON) -m convret train --output_dir $(DEMO_DIR) $(DEMO_TRAIN_FLAGS)
	$(PYTHON) -m convret evaluate --model $(DEMO_DIR)/final --baseline $(DEMO_DIR)/init --query-only --rewrite \
		--output $(DEMO_DIR)/eval --overwrite

test: setup
	$(PYTHON) -m pytest -q tests

# the heavy distributed-engine cases too (FSDP2 / DeepSpeed ZeRO-2 / ZeRO-3 under torchrun on CPU processes: every
# engine x {LoRA, full}, GradCache, SIGKILL resume, multi-node, the bundled engine configs, bench step's engine
# memory; about 11 minutes on 2 cores); `make test` runs one case per engine and the two-node case
test-engines: setup
	$(PYTHON) -m pytest -q --engines tests/test_train_engines.py

# the tests of everything that depends on transformers / peft / accelerate / sentence-transformers / faiss /
# FastAPI, at the oldest versions convret claims (.ci/oldest.txt); CI runs it in a second virtualenv (the
# packaging tests, which do not depend on those versions, run in `make test` only)
OLDEST_TESTS ?= tests/test_hf.py tests/test_hf_edges.py tests/test_model_matrix.py tests/test_csit.py \
	tests/test_train.py tests/test_train_real.py tests/test_train_gradcache.py tests/test_train_mixture.py \
	tests/test_retrieval_export.py tests/test_retrieval_generate.py tests/test_retrieval_chain.py \
	tests/test_retrieval_search_eval.py tests/test_mine.py tests/test_serve.py tests/test_session_encoder.py \
	tests/test_data_templates.py tests/test_summary_tokens.py tests/test_train_engines.py
test-oldest: PIP_INSTALL_OPTS = -c .ci/oldest.txt
test-oldest: setup
	$(PYTHON) -m pytest -q $(OLDEST_TESTS)

# Micro-benchmarks (bench/micro, pytest-benchmark; docs/benchmarks_micro.md). Run after `make setup`.
# Saved runs go to $(BENCH_STORAGE)/<machine>/NNNN_<commit>_<date>.json (ignored by git).
BENCH_STORAGE ?= .benchmarks
BENCH_OPTS ?= --benchmark-min-rounds=3 --benchmark-max-time=0.5 --benchmark-sort=name \
	--benchmark-columns=median,iqr,min,rounds
# absolute threshold, for a quiet dedicated machine: fail when a median got this much slower than the last run
BENCH_COMPARE_FAIL ?= median:25%
# in-run ratio threshold, for shared / CI machines: fail when a convret/peer speed-up dropped by this many percent
BENCH_RATIO_DROP ?= 25
# BENCH_ARGS: extra pytest arguments, e.g. BENCH_ARGS="-k small" for the small shapes only
BENCH_ARGS ?=
MICRO := $(PYTHON) -m pytest bench/micro $(BENCH_ARGS) -q -p no:cacheprovider --benchmark-storage=file://$(BENCH_STORAGE)

bench-micro:
	$(MICRO) $(BENCH_OPTS) --benchmark-autosave

# runs and saves the suite again, then both checks against the previous saved run; fails if either fails
bench-compare:
	@$(MICRO) $(BENCH_OPTS) --benchmark-autosave --benchmark-compare --benchmark-compare-fail=$(BENCH_COMPARE_FAIL); \
	absolute=$$?; \
	$(PYTHON) bench/micro/compare_ratios.py --storage $(BENCH_STORAGE) --max-drop $(BENCH_RATIO_DROP); \
	ratios=$$?; \
	echo "bench-compare: absolute medians ($(BENCH_COMPARE_FAIL)) exit $$absolute, in-run ratios ($(BENCH_RATIO_DROP)%) exit $$ratios"; \
	test $$absolute -eq 0 -a $$ratios -eq 0

# only the in-run ratio check of the two latest saved runs (no new run): the check CI could gate on
bench-compare-ratios:
	$(PYTHON) bench/micro/compare_ratios.py --storage $(BENCH_STORAGE) --max-drop $(BENCH_RATIO_DROP)

# CI: every micro-benchmark body once, untimed, CSIT cases at the small shape
bench-micro-smoke:
	$(MICRO) --benchmark-disable --micro-smoke
