"""The files of a batch job: the prompt files it reads (inputs.py) and the images their rows name
(images.py), the record it writes per row (records.py), and predictions.csv and summary.json
rebuilt from the records (finalize.py)."""
