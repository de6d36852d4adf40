# medusa-forge pipeline targets. Every knob is a variable (docs/build.md has the details):
#
#   make demo                                                 # the whole job on CPU: engines, Triton, eval, promote
#   make native-engine MEDUSA=heads/ DTYPE=bf16 TREE=small    # native engine (+ smoke generate + Triton repo)
#   make native-engine MEDUSA=heads/ DTYPE=fp8                # FP8 GEMMs on an H100 (FP8_EMULATE=1 elsewhere)
#   make native-engine MEDUSA=heads/ TREE=auto                # tree searched on this device (CALIB prompts)
#   make fp8-check MEDUSA=heads/ | make tree-check MEDUSA=heads/   # H100: fp8 vs bf16, auto vs preset trees
#   make engine MODEL=/models/base MEDUSA=/models/heads DTYPE=fp16|bf16|fp8 TREE=mc_sim_7b_63 TP=1
#   make engine-dry-run ... | make test | make lint | make docker | make image-deps-check  # the image's torch etc.
#
# `engine` runs convert trtllm -> build trtllm -> triton-repo for TensorRT-LLM $(TRTLLM) (1.2: 1.2.1 in Triton 26.07,
# or 0.11: 0.11.0 in 24.07; the NGC container of the Dockerfile and a GPU). TREE=auto there takes the tree
# searched by `make native-engine TREE=auto`.

PYTHON      ?= python3
MF          ?= $(PYTHON) -m medusa_forge.cli
MODEL       ?= ../shared/models/pycoder-26m
MEDUSA      ?=
DTYPE       ?=
TREE        ?= mc_sim_7b_63
TP          ?= 1
PROMPTS     ?= ../shared/data/code_prompts.jsonl
CALIB       ?= $(if $(filter auto,$(TREE)),$(PROMPTS))
CALIB_SPLIT ?= even
FP8_EMULATE ?=
MAX_BATCH   ?= 8
OUT         ?= out
RESULTS     ?= bench/results
PROMPT      ?= def fibonacci(n):
TRTLLM      ?= $(or $(MEDUSA_FORGE_TRTLLM),1.2)
TRITON_TAG  ?= $(if $(filter 0.11,$(TRTLLM)),24.07,26.07)
IMAGE       ?= medusa-forge:$(TRITON_TAG)
CONVERT_ARGS ?=
BUILD_ARGS   ?=
REPO_ARGS    ?=

# Asked of torch once, and only by targets that need it (the lazy-once idiom).
CUDA = $(eval CUDA := $(shell $(PYTHON) -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0))$(CUDA)

# ---------------------------------------------------------------------------------------- TensorRT-LLM
ENGINE_DTYPE   = $(or $(DTYPE),fp16)
CONVERT_DTYPE  = $(if $(filter bf16 bfloat16,$(ENGINE_DTYPE)),bfloat16,float16)
# FP8 calibrates on CALIB when given, else on the prompts shipped in the package (the image has no ../shared).
CONVERT_QUANT  = $(if $(filter fp8,$(ENGINE_DTYPE)),--quantization fp8 $(if $(CALIB),--calib-prompts $(CALIB)))
CKPT           = $(OUT)/trtllm-ckpt-$(ENGINE_DTYPE)-tp$(TP)
ENGINE         = $(OUT)/trtllm-engine-$(ENGINE_DTYPE)-tp$(TP)
REPO           = $(OUT)/triton-repo-trtllm-$(ENGINE_DTYPE)
# TREE=auto: the tree the native engine searched on this GPU (its manifest is a tree file).
TRT_TREE       = $(if $(filter auto,$(TREE)),$(OUT)/native-engine-$(NATIVE_DTYPE)/medusa_forge.json,$(TREE))

# ---------------------------------------------------------------------------------------- native
NATIVE_DTYPE  = $(or $(DTYPE),$(if $(filter 1,$(CUDA)),bf16,fp32))
NATIVE_ENGINE = $(OUT)/native-engine-$(NATIVE_DTYPE)
NATIVE_REPO   = $(OUT)/triton-repo-native-$(NATIVE_DTYPE)
HEADS_ARGS    = $(if $(MEDUSA),--medusa $(MEDUSA) --medusa-choices $(TREE))
CALIB_ARGS    = $(if $(CALIB),--calib-prompts $(CALIB) --calib-split $(CALIB_SPLIT))
EMULATE       = $(if $(FP8_EMULATE),--fp8-emulate)

# ---------------------------------------------------------------------------------------- demo
DEMO_DIR        ?= $(OUT)/demo
DEMO_HEADS      ?=
DEMO_TREE       ?=
DEMO_PER_TOPIC  ?= 2
DEMO_NEW_TOKENS ?= 64
DEMO_ARGS       ?=

.PHONY: help demo engine engine-dry-run native-engine fp8-check tree-check test lint docker image-deps-check check-medusa

help:
	@sed -n '1,12p' Makefile

check-medusa:
	@test -n "$(MEDUSA)" || { echo "error: set MEDUSA=<Medusa heads dir> (e.g. from medusa-forge train-heads)" >&2; exit 2; }

engine: check-medusa
	$(if $(filter-out fp16 float16 bf16 bfloat16 fp8,$(ENGINE_DTYPE)),$(error DTYPE=$(ENGINE_DTYPE): make engine takes fp16, bf16 or fp8))
	$(MF) convert trtllm --model $(MODEL) --medusa $(MEDUSA) --out $(CKPT) --dtype $(CONVERT_DTYPE) \
		--tp-size $(TP) --trtllm-version $(TRTLLM) --medusa-choices $(TRT_TREE) $(CONVERT_QUANT) --overwrite \
		$(CONVERT_ARGS)
	$(MF) build trtllm --checkpoint-dir $(CKPT) --out $(ENGINE) --medusa-choices $(TRT_TREE) \
		--max-batch-size $(MAX_BATCH) --overwrite $(BUILD_ARGS)
	$(MF) triton-repo --engine $(ENGINE) --out $(REPO) --overwrite $(REPO_ARGS)

engine-dry-run:
	$(MF) build trtllm --checkpoint-dir $(CKPT) --out $(ENGINE) --medusa-choices $(TRT_TREE) \
		--max-batch-size $(MAX_BATCH) --dry-run $(BUILD_ARGS)

native-engine:
	$(MF) build native --model $(MODEL) $(HEADS_ARGS) --out $(NATIVE_ENGINE) --dtype $(NATIVE_DTYPE) \
		$(CALIB_ARGS) $(EMULATE) --overwrite $(BUILD_ARGS)
	$(if $(FP8_EMULATE),MEDUSA_FORGE_FP8_EMULATE=1) $(MF) generate --model $(NATIVE_ENGINE) \
		$(if $(MEDUSA),--medusa $(NATIVE_ENGINE)/medusa) --prompt '$(PROMPT)' --max-new-tokens 32 --stats
	$(if $(FP8_EMULATE),MEDUSA_FORGE_FP8_EMULATE=1) $(MF) triton-repo --engine $(NATIVE_ENGINE) \
		--out $(NATIVE_REPO) --overwrite $(REPO_ARGS)

# H100: bf16 and fp8 native engines from the same heads; greedy agreement (>= 98%) and step times.
fp8-check: check-medusa
	$(MAKE) native-engine DTYPE=bf16
	$(MAKE) native-engine DTYPE=fp8
	$(MF) build compare-fp8 --reference $(OUT)/native-engine-bf16 --candidate $(OUT)/native-engine-fp8 \
		--prompts $(PROMPTS) --limit 32 --max-new-tokens 64 $(EMULATE) --out $(RESULTS)/fp8_vs_bf16.json

# H100: the auto tree (calibrated on the even prompts) vs mc_sim_7b_63 and chain-5 on the odd ones.
tree-check: check-medusa
	$(MAKE) native-engine TREE=auto
	$(MF) build compare-trees --engine $(NATIVE_ENGINE) --trees engine,mc_sim_7b_63,chain-5 \
		--prompts $(PROMPTS) --split odd $(EMULATE) --out $(RESULTS)/trees_auto_vs_presets.json

# The README's first run: the shipped heads (or DEMO_HEADS) -> a base and a Medusa native engine -> one
# tritonserver hosting both -> a streamed gRPC query -> eval mmlu / speed / report -> promote (the
# candidate passes, a degraded one is rejected) -> a summary table. A few minutes on 2 CPU cores.
demo:
	$(MF) demo --model $(MODEL) --prompts $(PROMPTS) --out $(DEMO_DIR) $(if $(DEMO_HEADS),--heads $(DEMO_HEADS)) \
		$(if $(DEMO_TREE),--medusa-choices $(DEMO_TREE)) --per-topic $(DEMO_PER_TOPIC) \
		--max-tokens $(DEMO_NEW_TOKENS) $(DEMO_ARGS)

test:
	$(PYTHON) -m pytest -q -n auto --dist loadfile

lint:
	$(PYTHON) -m ruff check medusa_forge tests
	$(PYTHON) -m ruff format --check medusa_forge tests
	lint-imports
	hadolint --config .hadolint.yaml Dockerfile

docker:
	docker build --build-arg TRTLLM=$(TRTLLM) --build-arg TRITON_TAG=$(TRITON_TAG) -t $(IMAGE) .

# The convert tests in a venv (outside the repo) with the versions the $(TRTLLM) image gives medusa-forge.
image-deps-check:
	bash tools/image_deps.sh $(TRTLLM)
