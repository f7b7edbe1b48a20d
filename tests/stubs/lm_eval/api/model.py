class LM:
    def __init__(self, *args, **kwargs):
        pass
