def register_model(*names):
    def wrap(cls):
        return cls

    return wrap
