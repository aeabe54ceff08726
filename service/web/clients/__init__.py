"""The APIs of the clients people already point at an image server, beside /score: AUTOMATIC1111's
(a1111.py), Hugging Face's text-to-image task (huggingface.py), and following and stopping any
request by its id (control.py). Each route generates through ``answer_generation``, /score's path."""
