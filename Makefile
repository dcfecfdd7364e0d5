# World Models for CarRacing-v3: every target creates .venv and installs requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR ?= /tmp/wm-smoke
ROUND ?= 1
ITER_EPISODES ?= 100
DATA_DIR ?= data
CKPT_DIR ?= checkpoints
LOG_DIR ?= runs
BACKEND ?= fast
WM_ARCH ?= gru

.PHONY: venv test train iterate smoke bench

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

# The default pipeline, resumable: re-running continues where a killed run stopped.
train: venv
	$(PY) collect_data.py --data-dir $(DATA_DIR) --episodes 200 --workers 2 --env-backend $(BACKEND)
	$(PY) train_vae.py --data-dir $(DATA_DIR) --ckpt-dir $(CKPT_DIR) --log-dir $(LOG_DIR) --epochs 3
	$(PY) train_world_model.py --data-dir $(DATA_DIR) --ckpt-dir $(CKPT_DIR) --log-dir $(LOG_DIR) --arch $(WM_ARCH)
	$(PY) train_cmaes_in_dream.py --ckpt-dir $(CKPT_DIR) --log-dir $(LOG_DIR) --generations 100
	$(PY) evaluate.py --ckpt-dir $(CKPT_DIR) --controller cmaes --episodes 100

# One round of on-policy data (ROUND=1, 2, ...; each round drives its own new tracks): the current agent
# drives with exploration noise, the world model goes on training on all episodes (20 more epochs), a new
# controller evolves in the corrected dream and is evaluated. Resumable like every stage.
iterate: venv
	$(PY) collect_data.py --policy agent --ckpt-dir $(CKPT_DIR) --data-dir $(DATA_DIR) --episodes $(ITER_EPISODES) \
		--seed $$((100000 * $(ROUND))) --noise 0.1 --workers 2 --env-backend $(BACKEND)
	$(PY) train_world_model.py --data-dir $(DATA_DIR) --ckpt-dir $(CKPT_DIR) --log-dir $(LOG_DIR) --arch $(WM_ARCH) \
		--epochs $$((40 + 20 * $(ROUND)))
	$(PY) train_cmaes_in_dream.py --ckpt-dir $(CKPT_DIR) --log-dir $(LOG_DIR) --generations 100
	$(PY) evaluate.py --ckpt-dir $(CKPT_DIR) --controller cmaes --episodes 100 --out $(CKPT_DIR)/eval_cmaes_round$(ROUND).json

# The whole pipeline with tiny settings, writing RUN_DIR/{data,checkpoints,runs}.
smoke: venv
	$(PY) collect_data.py --data-dir $(RUN_DIR)/data --episodes 3 --max-steps 100 --workers 2
	$(PY) train_vae.py --data-dir $(RUN_DIR)/data --ckpt-dir $(RUN_DIR)/checkpoints --log-dir $(RUN_DIR)/runs \
		--epochs 1 --batch-size 32 --val-frames 64
	$(PY) train_world_model.py --data-dir $(RUN_DIR)/data --ckpt-dir $(RUN_DIR)/checkpoints --log-dir $(RUN_DIR)/runs \
		--epochs 1 --batch-size 2 --hidden-dim 32
	$(PY) train_cmaes_in_dream.py --ckpt-dir $(RUN_DIR)/checkpoints --log-dir $(RUN_DIR)/runs \
		--generations 2 --popsize 4 --rollouts 2 --max-steps 50 --eval-every 0
	$(PY) train_ppo.py --ckpt-dir $(RUN_DIR)/checkpoints --log-dir $(RUN_DIR)/runs \
		--total-steps 512 --num-envs 4 --rollout-steps 64 --max-steps 100 --hidden-dim 32 --eval-every 0
	$(PY) train_ppo_in_dream.py --ckpt-dir $(RUN_DIR)/checkpoints --log-dir $(RUN_DIR)/runs \
		--total-steps 2048 --num-envs 16 --rollout-steps 64 --max-steps 50 --hidden-dim 32 --eval-every 0
	for controller in cmaes ppo ppo_dream; do \
		$(PY) evaluate.py --ckpt-dir $(RUN_DIR)/checkpoints --controller $$controller --episodes 2 --max-steps 100 || exit 1; \
	done

bench: venv
	$(PY) benchmarks/bench.py
