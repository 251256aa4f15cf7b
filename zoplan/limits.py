"""What a user may ask for: the bounds every entry (options, plan files, the API) checks before
any work. A value past one is a typo or a hostile input, refused with a message in well under a
second; each bound is far above any real use (and documented where the value is asked for).

No imports: the command line reads these before it loads anything else.
"""

MAX_GLOBAL_BATCH = 65536  # sequences per step
MIN_SEQ_LEN = 2  # tokens per sequence: a language model's loss predicts each token after the first
MAX_SEQ_LEN = 1 << 20  # tokens per sequence (a model's own positions bound it further)
MAX_LAYERS = 512  # a model's blocks: the deepest models have ~130 (a step program grows with them)
MAX_SLICES_PER_BLOCK = 128  # one upload op per slice
MAX_STEPS = 10**9  # a run's steps: a billion tiny steps take years
MAX_MEASURED_STEPS = 10_000  # steps timed by calibrate and validate: their figures settle within dozens
MAX_NODES = 4096  # machines in a topology and a run (--nnodes)
MAX_RANKS = 4096  # processes a plan spans, every node's together: its rank table fits a plan file's bounds
MAX_ID_CHARS = 128  # a GPU's, socket's or switch's id in a topology (a plan's rank table repeats them)
MAX_LORA_RANK = 4096  # LoRA's rank (MeZO's: 8 to 16)
MAX_PREFIX_TOKENS = 1024  # a prefix's trained tokens per block (MeZO's: 5)
MAX_TOKENS = 1e18  # compare's --tokens: the largest pretraining runs see ~1e14 (and inf prices nothing)
# A plan holds a rank table: MAX_RANKS entries of GPU ids up to MAX_ID_CHARS (a 4096-GPU plan of
# 140-character ids is 1.06 MB, more than other files' 1 MiB: zoplan plan wrote it, every reader refused it)
MAX_PLAN_BYTES = 16 << 20
