"""Helpers shared by tests: training straight through the loop, and a tiny GPT-2 directory."""


def train_direct(loaded, stance, method, config, recipe, examples=None, instruments=None):
    """One run straight through the loop, without a session's run cache."""
    from stance_harness.runs.request import TrainingRequest
    from stance_harness.runs.training import train_run

    request = TrainingRequest.build(loaded, stance, method, config=config, recipe=recipe, examples=examples,
                                    instruments=instruments)
    return train_run(request, loaded, stance)


def save_tiny_gpt2(path, layers: int = 2, positions: int = 128):
    """A randomly initialised GPT-2 (Conv1D attention) with the embedded models' tokenizer, saved to `path`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from stance_harness.models.weights import build_tokenizer
    from stance_harness.models.tiny import EOS

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_embd=32, n_head=2, n_layer=layers, n_positions=positions,
                               bos_token_id=eos, eos_token_id=eos)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
