# `make run`: set up and start the app on 127.0.0.1. `make test`: set up and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8501
DATA := cache/emoji3/metadata.csv
DATA16 := cache/emoji3-16/metadata.csv

.PHONY: install data prepare check-host run test demo-model mini-model sd-demo-model clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

$(DATA): | $(STAMP)
	$(PY) -m dtrak_core build-data

# The same subjects rendered at 16 px, for the small evaluation model.
$(DATA16): | $(STAMP)
	$(PY) -m dtrak_core build-data --size 16 --out cache/emoji3-16

data: $(DATA) $(DATA16)

# Beyond this computer the app needs a secret (it checks too: dtrak_app/common.py require_access).
check-host:
	@case "$(HOST)" in 127.*|localhost|::1) ;; *) if [ -z "$$DTRAK_TOKEN" ]; then \
	  echo "error: HOST=$(HOST) would let anyone who reaches this machine browse the training images, register" \
	    "models and start jobs; set DTRAK_TOKEN to a random string of at least 16 characters" \
	    "(python3 -c 'import secrets; print(secrets.token_urlsafe(24))') and open the app with ?token=<it>," \
	    "or leave HOST at 127.0.0.1 (see README, Threat model)" >&2; exit 2; fi ;; esac

# What the first page load shows, computed once (a few seconds when already done): the default
# model's training features at the default settings, its gallery samples, its default lambda and
# the first target's scores. A failure is reported and ignored: the app then offers to compute.
prepare: install data
	-$(PY) -m dtrak_app.prepare

run: check-host install data prepare
	$(VENV)/bin/streamlit run app.py --server.address $(HOST) --server.port $(PORT) --server.headless true

test: install data
	$(PY) -m pytest -q

# The embedded models, retrained from scratch (see models/*/recipe.json for what ran).
demo-model: install data
	$(PY) -m dtrak_core train --out models/emoji3-demo --preset demo --filter-column category \
	  --filter-values "Smileys & Emotion" --steps 5000 --warmup-steps 300 --lr 6e-4 --batch-size 32 \
	  --checkpoint-every 1250 --keep-checkpoints
	$(PY) -m dtrak_core generate --model models/emoji3-demo --seeds 0-63 --out cache/demo-samples

mini-model: install data
	$(PY) -m dtrak_core train --data cache/emoji3-16 --out models/emoji3-mini --preset mini --image-size 16 \
	  --filter-column category --filter-values "Smileys & Emotion" --steps 800 --warmup-steps 80 \
	  --lr 1e-3 --batch-size 32 --checkpoint-every 200 --keep-checkpoints

# The text-to-image demo (docs/training.md): a small Stable Diffusion trained on emoji3 without
# "Travel & Places", then a LoRA on "Travel & Places" (all three artists), captions "<name>, <artist> style".
SD_BASE_CATEGORIES := "Activities" "Animals & Nature" "Food & Drink" "Objects" "People & Body" "Smileys & Emotion" "Symbols"
CAPTIONS := cache/emoji3-captions/metadata.csv

$(CAPTIONS): | $(DATA)
	$(PY) -m dtrak_core caption-data --data cache/emoji3 --out cache/emoji3-captions --template "{name}, {artist} style"

sd-demo-model: install data $(CAPTIONS)
	$(PY) -m dtrak_core train-sd --data cache/emoji3-captions --out models/emoji3-sd --preset demo \
	  --filter-column category --filter-values $(SD_BASE_CATEGORIES) --vae-steps 2000 --steps 10000 --checkpoint-every 500
	$(PY) -m dtrak_core train-lora --base models/emoji3-sd --data cache/emoji3-captions --out models/emoji3-sd-travel \
	  --filter-column category --filter-values "Travel & Places" --steps 1500 --checkpoint-every 250 --keep-checkpoints

clean:
	rm -rf $(VENV) cache/emoji3 cache/samples
