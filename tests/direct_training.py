"""Training straight through the loop, for tests that need no session."""


def train_direct(loaded, stance, method, config, recipe, examples=None, instruments=None):
    """One run straight through the loop, without a session's run cache."""
    from harness.request import TrainingRequest
    from harness.training import train_run

    request = TrainingRequest.build(loaded, stance, method, config=config, recipe=recipe, examples=examples,
                                    instruments=instruments)
    return train_run(request, loaded, stance)
