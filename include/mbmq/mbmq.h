// mbmq/mbmq.h: the whole public API of mbmq.
#pragma once

#include "mbmq/buffer.h"
#include "mbmq/channel.h"
#include "mbmq/deadline.h"
#include "mbmq/file.h"
#include "mbmq/introspect.h"
#include "mbmq/msg_queue.h"
#include "mbmq/rendezvous.h"
#include "mbmq/result.h"
#include "mbmq/stream.h"
#include "mbmq/topic.h"
#include "mbmq/wait_policy.h"
