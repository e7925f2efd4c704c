"""How the peers share an update: the learner, its optimizers and the sync strategies.

learner.py (`Learner.step(loss, terms)`: one update, identical on every peer), optim.py (Adam, RMSprop
and SGD on one flat parameter). It talks to the other peers only through the Communicator interface
(`p2prl.comm`), never through torch.distributed.
"""
