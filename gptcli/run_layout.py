"""The names of what a training run's folder holds (``gptcli.training.run_folder`` writes them): here, at the
top, so that loading weights (``gptcli.checkpoint``) and ``inspect`` can recognise a run without importing
the training package."""

STATE_FILE = "state.safetensors"  # everything to resume bit for bit (gptcli.training.state)
LOG_FILE = "train.jsonl"
PLOT_FILE = "loss.png"
BEST_DIR = "best"
DATA_DIR = "data"
MODEL_FILE = "model.safetensors"
ADAPTERS_FILE = "adapters.safetensors"  # a --lora run's weights: the adapters alone (gptcli.adapters)
CLASSIFIER_FILE = "classifier.safetensors"  # a --task classify run's weights (gptcli.adapters)
RUN_MARKERS = (STATE_FILE, LOG_FILE)  # a folder holding one of these is a training run
# Every name a run writes (and the temporary files of its atomic writes, ".NAME.tmp-PID").
RUN_ENTRIES = (STATE_FILE, LOG_FILE, PLOT_FILE, MODEL_FILE, ADAPTERS_FILE, CLASSIFIER_FILE, "config.json", BEST_DIR,
               DATA_DIR)
