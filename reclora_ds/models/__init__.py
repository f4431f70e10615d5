"""Pure model modules (no I/O, no device placement): the CRM (SIM, DIN) and Personalized LoRA."""
