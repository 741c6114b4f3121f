"""The saga tutorial's PaymentProcessing example."""
