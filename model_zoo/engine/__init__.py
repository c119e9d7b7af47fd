"""The engine above the models: training (Trainer + callbacks), evaluation, serving reports and the
experiment runner. Models declare encode / score / loss; the engine drives them and never reaches
into a model's internals beyond the capabilities it declares (model_zoo/base.py)."""
