"""What train and infer share: loading a model, generating, the machine at hand."""
