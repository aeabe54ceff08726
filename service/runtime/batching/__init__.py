"""How images share the engines: the step loop (steploop.py: images join and leave the running
batch between denoising steps; one lane per engine, lane.py), the policy that decides who runs
(scheduler.py), the rule for a failed engine call that it shares with batch jobs (oom.py), and the
queue's room (room.py)."""
